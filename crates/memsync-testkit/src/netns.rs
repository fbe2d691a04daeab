//! Two test hosts: network namespaces joined by a veth pair, removed on drop.

use std::process::Command;

/// Namespaces `a` and `b`; `a` has `a_addr`, `b` has `b_addr` on a /24 between them.
#[derive(Debug)]
pub struct Netns {
    pub a: String,
    pub b: String,
    pub a_addr: String,
    pub b_addr: String,
    /// The veth ends in `a` and in `b`.
    veth: (String, String),
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

impl Netns {
    /// Make the pair, named after this process and `tag` (several may exist at once); `None`
    /// after [`crate::skip::skip`] where namespaces cannot be made (root and iproute2 are
    /// needed), which fails under CI.
    pub fn create(test: &str, tag: u8) -> Option<Netns> {
        let id = std::process::id() % 10_000;
        let (a, b) = (format!("msa{id}t{tag}"), format!("msb{id}t{tag}"));
        let octet = 1 + (id * 7 + tag as u32) % 250;
        let (va, vb) = (format!("va{id}t{tag}"), format!("vb{id}t{tag}"));
        let n = Netns {
            a: a.clone(),
            b: b.clone(),
            a_addr: format!("10.213.{octet}.1"),
            b_addr: format!("10.213.{octet}.2"),
            veth: (va.clone(), vb.clone()),
        };
        let up = ip(&["netns", "add", &a])
            && ip(&["netns", "add", &b])
            && ip(&[
                "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
            ])
            && ip(&[
                "-n",
                &a,
                "addr",
                "add",
                &format!("{}/24", n.a_addr),
                "dev",
                &va,
            ])
            && ip(&[
                "-n",
                &b,
                "addr",
                "add",
                &format!("{}/24", n.b_addr),
                "dev",
                &vb,
            ])
            && ip(&["-n", &a, "link", "set", &va, "up"])
            && ip(&["-n", &b, "link", "set", &vb, "up"])
            && ip(&["-n", &a, "link", "set", "lo", "up"])
            && ip(&["-n", &b, "link", "set", "lo", "up"]);
        if !up {
            drop(n);
            crate::skip::skip(
                test,
                "network namespaces cannot be made here (needs root and iproute2: scripts/setup.sh)",
            );
            return None;
        }
        Some(n)
    }

    /// Take the link between the two namespaces down (`up == false`: from then on nothing
    /// passes, as when a cable is cut or a host dies) or up again; whether `ip` succeeded.
    pub fn link(&self, up: bool) -> bool {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.a, "link", "set", &self.veth.0, state])
            && ip(&["-n", &self.b, "link", "set", &self.veth.1, state])
    }

    /// Move the calling thread into network namespace `ns`: sockets it makes from now on are
    /// that host's (the two sides of a test can then live in one process).
    pub fn enter(ns: &str) -> std::io::Result<()> {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&f),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .map_err(std::io::Error::from)
    }

    /// A tokio runtime whose threads (workers and blocking pool) all live in namespace `ns`.
    pub fn runtime(ns: &str, workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
        std::fs::File::open(format!("/var/run/netns/{ns}"))?; // fails early if it is missing
        let ns = ns.to_owned();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .enable_all()
            .on_thread_start(move || {
                Self::enter(&ns).expect("entering the network namespace");
            })
            .build()
    }

    /// `ip netns exec NS` as the start of a command line.
    pub fn exec_in(ns: &str) -> [&str; 4] {
        ["ip", "netns", "exec", ns]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}
