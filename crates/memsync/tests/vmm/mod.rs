//! The VMM integrations (memsync-vmm) driven through the binary, against processes that play
//! the VMMs' sides of the protocols.

mod ch;
mod firecracker;
