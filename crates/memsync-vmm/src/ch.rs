//! The sending side of Cloud Hypervisor's local migration protocol, for an
//! on-demand restore whose memory comes from a store.
//!
//! Followed: `vm-migration/src/protocol.rs` (protocol version 0, the
//! current one), `vmm/src/uffd.rs`, `vmm/src/lib.rs` (the receiver and its
//! fault connection) and `offload_daemon/src/main.rs`, `docs/snapshot_restore.md`
//! ("On demand restore usage") at cloud-hypervisor commit ae44c297 (August
//! 2026). Cloud Hypervisor runs `ch-remote receive-migration
//! receiver_url=unix:SOCKET,memory_mode=postcopy`; this side connects and
//! sends, on the main connection, each request answered by a response:
//!
//! * `Start` (the protocol version in the first two header bytes);
//! * with shared memory, one `MemoryFd` per memory slot: a 4-byte slot
//!   number sent with an empty memfd attached (`SCM_RIGHTS`), sized to the
//!   slot's `file_offset + size`;
//! * `Config` (the `VmMigrationConfig` JSON of the snapshot);
//! * then a second connection, the fault connection, announced by the
//!   2-byte role `Fault`, on which Cloud Hypervisor sends `PageFault`
//!   requests (one `MemoryRange {gpa, length}`) from then on;
//! * `State` (the device state JSON) and `Complete` or `CompletePaused`.
//!
//! A `PageFault` is answered from the store: with shared memory the bytes
//! are written into the slot's memfd and the response carries no payload
//! (Cloud Hypervisor maps them with `UFFDIO_CONTINUE`); otherwise the
//! response's length is the range's and the bytes follow it (Cloud
//! Hypervisor copies them in with `UFFDIO_COPY`). A store failure answers
//! `Error` (the VM then fails instead of reading wrong memory).
//!
//! Frames are little-endian: a request is `command: u16, headers: [u8; 6],
//! length: u64`, a response `status: u16, padding: [u8; 6], length: u64`
//! (status 1 = Ok, 2 = Error), a `MemoryRange` is `gpa: u64, length: u64`.
//!
//! The store holds the guest RAM slots back to back in ascending `gpa`
//! order (the layout of Cloud Hypervisor's `memory-ranges` snapshot file
//! for a VM without holes in its slots).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use memsync_core::DynStore;
use memsync_sys::{MemfdFlags, ftruncate, memfd_create, send_fds};
use serde_json::Value;

use crate::{Error, io};

/// The protocol version sent in `Start`.
pub const PROTOCOL_VERSION: u16 = 0;
/// Largest `PageFault` range served (Cloud Hypervisor's source refuses
/// above 1 GiB; it asks for one page).
pub const MAX_FAULT_LEN: u64 = 64 << 20;
/// Largest payload accepted in a response.
const MAX_RESPONSE_PAYLOAD: u64 = 1 << 20;

/// Commands.
#[allow(missing_docs)]
pub mod command {
    pub const START: u16 = 1;
    pub const CONFIG: u16 = 2;
    pub const STATE: u16 = 3;
    pub const MEMORY: u16 = 4;
    pub const COMPLETE: u16 = 5;
    pub const ABANDON: u16 = 6;
    pub const MEMORY_FD: u16 = 7;
    pub const COMPLETE_PAUSED: u16 = 8;
    pub const PAGE_FAULT: u16 = 9;
}
/// Response status `Ok`.
pub const STATUS_OK: u16 = 1;
/// Response status `Error`.
pub const STATUS_ERROR: u16 = 2;
/// The role of the fault connection.
pub const ROLE_FAULT: u16 = 2;

/// Encodes a request (or, with a status instead of a command, a response).
#[must_use]
pub fn frame(code: u16, headers: [u8; 6], length: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..2].copy_from_slice(&code.to_le_bytes());
    b[2..8].copy_from_slice(&headers);
    b[8..].copy_from_slice(&length.to_le_bytes());
    b
}

/// Decodes a 16-byte request or response: `(code, headers, length)`.
#[must_use]
pub fn parse_frame(b: &[u8; 16]) -> (u16, [u8; 6], u64) {
    let mut h = [0u8; 6];
    h.copy_from_slice(&b[2..8]);
    (
        u16::from_le_bytes([b[0], b[1]]),
        h,
        u64::from_le_bytes(b[8..].try_into().unwrap_or([0; 8])),
    )
}

/// One guest RAM slot of the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Memory slot number.
    pub slot: u32,
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Where the slot starts in its memory file.
    pub file_offset: u64,
    /// Where the slot's bytes start in the store.
    pub store_offset: u64,
}

/// Reads `memory_manager_data.guest_ram_mappings` from a
/// `VmMigrationConfig` JSON and lays the slots out in the store.
///
/// # Errors
///
/// [`Error::Protocol`] for a missing or malformed field, overlapping slots,
/// or more than 4096 slots.
pub fn parse_slots(config: &[u8]) -> Result<Vec<Slot>, Error> {
    let bad = |m: String| Error::Protocol(m);
    let v: Value = serde_json::from_slice(config)
        .map_err(|e| bad(format!("the VM configuration is not valid JSON: {e}")))?;
    let maps = v
        .pointer("/memory_manager_data/guest_ram_mappings")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            bad("the VM configuration has no memory_manager_data.guest_ram_mappings".into())
        })?;
    if maps.is_empty() || maps.len() > 4096 {
        return Err(bad(format!("{} guest RAM mappings", maps.len())));
    }
    let mut slots = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        let get = |k: &str| {
            m.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(format!("guest RAM mapping {i}: no unsigned {k}")))
        };
        let slot = u32::try_from(get("slot")?).map_err(|_| bad(format!("mapping {i}: slot")))?;
        let (gpa, size, file_offset) = (get("gpa")?, get("size")?, get("file_offset")?);
        if size == 0 || gpa.checked_add(size).is_none() || file_offset.checked_add(size).is_none() {
            return Err(bad(format!("guest RAM mapping {i}: bad size {size}")));
        }
        slots.push(Slot {
            slot,
            gpa,
            size,
            file_offset,
            store_offset: 0,
        });
    }
    slots.sort_by_key(|s| s.gpa);
    let mut off = 0u64;
    for k in 0..slots.len() {
        if k > 0 && slots[k - 1].gpa + slots[k - 1].size > slots[k].gpa {
            return Err(bad(format!(
                "guest RAM mappings at {:#x} and {:#x} overlap",
                slots[k - 1].gpa,
                slots[k].gpa
            )));
        }
        slots[k].store_offset = off;
        off += slots[k].size;
    }
    Ok(slots)
}

/// An on-demand restore to do.
#[derive(Debug)]
pub struct Restore {
    /// The `VmMigrationConfig` JSON (the offload daemon's
    /// `migration_config.json`).
    pub config: Vec<u8>,
    /// The device state JSON (`state.json`).
    pub state: Vec<u8>,
    /// Guest memory, slots back to back by ascending gpa.
    pub store: DynStore,
    /// Hand Cloud Hypervisor memfds (shared memory) instead of answering
    /// faults inline.
    pub shared: bool,
    /// Resume the VM (`Complete`) instead of leaving it paused.
    pub resume: bool,
    /// The runtime store futures run on.
    pub runtime: tokio::runtime::Handle,
}

/// What a restore did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Report {
    /// `PageFault` requests answered.
    pub faults: u64,
    /// Bytes served.
    pub bytes: u64,
    /// Faults answered with `Error` (store failures).
    pub failed: u64,
}

fn send(s: &mut UnixStream, code: u16, headers: [u8; 6], payload: &[u8]) -> Result<(), Error> {
    s.write_all(&frame(code, headers, payload.len() as u64))
        .and_then(|()| s.write_all(payload))
        .map_err(io("sending to Cloud Hypervisor"))
}

fn expect_ok(s: &mut UnixStream, what: &str) -> Result<(), Error> {
    let mut b = [0u8; 16];
    s.read_exact(&mut b)
        .map_err(io(format!("reading Cloud Hypervisor's answer to {what}")))?;
    let (status, _, len) = parse_frame(&b);
    if len > 0 {
        if len > MAX_RESPONSE_PAYLOAD {
            return Err(Error::Protocol(format!(
                "answer to {what} carries {len} bytes"
            )));
        }
        let mut sink = vec![0u8; len as usize];
        s.read_exact(&mut sink)
            .map_err(io(format!("reading the answer to {what}")))?;
    }
    match status {
        STATUS_OK => Ok(()),
        STATUS_ERROR => Err(Error::Protocol(format!("Cloud Hypervisor refused {what}"))),
        other => Err(Error::Protocol(format!(
            "Cloud Hypervisor answered {what} with unknown status {other}"
        ))),
    }
}

impl Restore {
    /// Runs the restore against the Cloud Hypervisor listening on `socket`
    /// and serves its page faults until it closes the fault connection.
    ///
    /// # Errors
    ///
    /// A refused step, a malformed frame or configuration, socket errors.
    pub fn run(self, socket: &Path) -> Result<Report, Error> {
        let slots = parse_slots(&self.config)?;
        let total: u64 = slots.iter().map(|s| s.size).sum();
        if self.store.size() < total {
            return Err(Error::Protocol(format!(
                "the guest RAM is {total} bytes, the store only {}",
                self.store.size()
            )));
        }
        let mut main = UnixStream::connect(socket)
            .map_err(io(format!("connecting to {}", socket.display())))?;
        let mut hdr = [0u8; 6];
        hdr[..2].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        send(&mut main, command::START, hdr, &[])?;
        expect_ok(&mut main, "Start")?;
        let mut memfds: Vec<(Slot, File)> = Vec::new();
        if self.shared {
            for s in &slots {
                let fd = memfd_create(&format!("memsync-slot-{}", s.slot), MemfdFlags::default())
                    .map_err(io("memfd_create"))?;
                ftruncate(fd.as_fd(), s.file_offset + s.size).map_err(io("sizing a memfd"))?;
                main.write_all(&frame(command::MEMORY_FD, [0; 6], 4))
                    .map_err(io("sending MemoryFd"))?;
                send_fds(&main, &s.slot.to_le_bytes(), &[fd.as_fd()])
                    .map_err(io("sending a memfd"))?;
                expect_ok(&mut main, "MemoryFd")?;
                memfds.push((*s, File::from(fd)));
            }
        }
        send(&mut main, command::CONFIG, [0; 6], &self.config)?;
        expect_ok(&mut main, "Config")?;
        let mut fault = UnixStream::connect(socket).map_err(io("opening the fault connection"))?;
        fault
            .write_all(&ROLE_FAULT.to_le_bytes())
            .map_err(io("announcing the fault connection"))?;
        let server = Server {
            slots,
            memfds,
            store: self.store,
        };
        let rt = self.runtime.clone();
        let serving = std::thread::Builder::new()
            .name("memsync-ch-faults".into())
            .spawn(move || server.serve(&mut fault, &rt))
            .map_err(io("spawning the fault server"))?;
        let steps = (|| {
            send(&mut main, command::STATE, [0; 6], &self.state)?;
            expect_ok(&mut main, "State")?;
            let done = if self.resume {
                command::COMPLETE
            } else {
                command::COMPLETE_PAUSED
            };
            send(&mut main, done, [0; 6], &[])?;
            expect_ok(&mut main, "Complete")
        })();
        if let Err(e) = steps {
            let _ = main.shutdown(std::net::Shutdown::Both);
            return Err(e);
        }
        serving
            .join()
            .map_err(|_| Error::Protocol("the fault server panicked".into()))?
    }
}

struct Server {
    slots: Vec<Slot>,
    memfds: Vec<(Slot, File)>,
    store: DynStore,
}

impl Server {
    /// Answers `PageFault`s until Cloud Hypervisor closes the connection or
    /// sends `Abandon`.
    fn serve(&self, s: &mut UnixStream, rt: &tokio::runtime::Handle) -> Result<Report, Error> {
        let mut report = Report::default();
        let mut buf = Vec::new();
        loop {
            let mut b = [0u8; 16];
            match s.read_exact(&mut b) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(report),
                Err(e) => return Err(io("reading a PageFault")(e)),
            }
            let (cmd, _, len) = parse_frame(&b);
            match cmd {
                command::PAGE_FAULT if len == 16 => {}
                command::ABANDON => {
                    let _ = s.write_all(&frame(STATUS_OK, [0; 6], 0));
                    return Ok(report);
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected command {other} (payload {len}) on the fault connection"
                    )));
                }
            }
            let mut r = [0u8; 16];
            s.read_exact(&mut r).map_err(io("reading a MemoryRange"))?;
            let gpa = u64::from_le_bytes(r[..8].try_into().unwrap_or([0; 8]));
            let flen = u64::from_le_bytes(r[8..].try_into().unwrap_or([0; 8]));
            let slot = self
                .slots
                .iter()
                .find(|sl| gpa >= sl.gpa && gpa - sl.gpa < sl.size)
                .copied()
                .filter(|sl| flen > 0 && flen <= MAX_FAULT_LEN && gpa - sl.gpa + flen <= sl.size)
                .ok_or_else(|| {
                    Error::Protocol(format!(
                        "PageFault gpa={gpa:#x} len={flen} is not inside one guest RAM slot (or is longer than {MAX_FAULT_LEN})"
                    ))
                })?;
            let off = gpa - slot.gpa;
            buf.resize(flen as usize, 0);
            let read = rt.block_on(self.store.read(slot.store_offset + off, &mut buf));
            report.faults += 1;
            if let Err(e) = read {
                report.failed += 1;
                tracing::error!(gpa, len = flen, error = %e.chain(), "memsync-vmm: the store failed a PageFault: answering Error");
                s.write_all(&frame(STATUS_ERROR, [0; 6], 0))
                    .map_err(io("answering a PageFault"))?;
                continue;
            }
            report.bytes += flen;
            if let Some((_, f)) = self.memfds.iter().find(|(sl, _)| sl.slot == slot.slot) {
                f.write_all_at(&buf, slot.file_offset + off)
                    .map_err(io("writing a page into the memfd"))?;
                s.write_all(&frame(STATUS_OK, [0; 6], 0))
                    .map_err(io("answering a PageFault"))?;
            } else {
                s.write_all(&frame(STATUS_OK, [0; 6], flen))
                    .and_then(|()| s.write_all(&buf))
                    .map_err(io("answering a PageFault"))?;
            }
        }
    }
}
