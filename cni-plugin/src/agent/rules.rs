//! Redirection inside a pod's network namespace, written by the node agent:
//!
//! - nat output: the app's TCP (not marked by ztunnel, not to loopback, not on `lo`) goes to
//!   15001; its DNS (UDP and TCP port 53) to ztunnel's DNS proxy on 15053.
//! - nat prerouting: inbound TCP except HBONE (15008), ztunnel's own packets and kubelet
//!   probes (SNATed to 169.254.7.127 on the host) goes to 15006.
//! - mangle: packets ztunnel marks 0x539 set connmark 0x111; the app's replies on such a
//!   connection get fwmark 0x111, and `fwmark 0x111/0xfff lookup 100` with a `local` default
//!   route in table 100 delivers them back to ztunnel's transparent socket.
//! - raw: ztunnel's upstream DNS lives in its own conntrack zone, so its replies are not
//!   mistaken for replies to the app's redirected queries.
//!
//! The ports, marks and table come from [`mesh_core::capture`], which ztunnel and the
//! controller read too.
//!
//! The nftables table is replaced in one transaction (idempotent, atomic); removal deletes
//! exactly the table, the rules and the route it added.
//!
//! No process per pod: one short-lived thread switches into the pod's namespace and there
//! runs the nftables batch through libnftables ([`super::nft`]), the rule and routes over
//! rtnetlink ([`super::netlink`]) and writes the sysctl; each a fraction of a millisecond,
//! where `nsenter` + `nft` and two `nsenter` + `ip -batch` were a fork and exec each.

use std::fs::File;
use std::path::Path;

use super::netlink::{Netlink, ReturnPath};
use super::netns::EnterError;
use super::nft::{self, NftError};

/// Name of the nftables table the agent owns in each pod namespace.
pub const TABLE: &str = "ambient";
pub use mesh_core::capture::Ports;
use mesh_core::capture::{MARK_MASK, MESH_MARK, PROBE_SOURCE, RETURN_MARK, ROUTE_TABLE};
/// Where a proc filesystem's sysctl tree normally is (the default of `--proc-sys-dir`).
pub const PROC_SYS: &str = "/proc/sys";

/// Why rules could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{command} failed in {netns}: {stderr}")]
    Failed {
        command: String,
        netns: String,
        stderr: String,
    },
}

/// The nftables ruleset, as one atomic transaction replacing the table.
pub fn ruleset(p: Ports) -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n{}", table(p))
}

/// The table alone. Creating it in a namespace that has none (`create` fails if it exists)
/// costs a third of replacing it: no deletion for the kernel to wait out.
fn first_install(p: Ports) -> String {
    format!("create table inet {TABLE}\n{}", table(p))
}

fn table(p: Ports) -> String {
    format!(
        r#"table inet {TABLE} {{
  chain prerouting_raw {{
    type filter hook prerouting priority raw; policy accept;
    meta mark & {MARK_MASK:#x} != {MESH_MARK:#x} udp sport 53 ct zone set 1
  }}
  chain output_raw {{
    type filter hook output priority raw; policy accept;
    meta mark & {MARK_MASK:#x} == {MESH_MARK:#x} udp dport 53 ct zone set 1
  }}
  chain prerouting_mangle {{
    type filter hook prerouting priority mangle; policy accept;
    meta mark & {MARK_MASK:#x} == {MESH_MARK:#x} ct mark set {RETURN_MARK:#x}
  }}
  chain output_mangle {{
    type route hook output priority mangle; policy accept;
    ct mark & {MARK_MASK:#x} == {RETURN_MARK:#x} meta mark set {RETURN_MARK:#x}
  }}
  chain prerouting_nat {{
    type nat hook prerouting priority dstnat; policy accept;
    meta mark & {MARK_MASK:#x} == {MESH_MARK:#x} return
    ip saddr {PROBE_SOURCE} return
    meta l4proto tcp tcp dport {inbound} return
    meta l4proto tcp redirect to :{plain}
  }}
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    meta mark & {MARK_MASK:#x} == {MESH_MARK:#x} return
{dns}    oifname "lo" return
    ip daddr 127.0.0.1 return
    ip6 daddr ::1 return
    meta l4proto tcp redirect to :{outbound}
  }}
}}
"#,
        inbound = p.inbound,
        plain = p.inbound_plaintext,
        dns = p
            .dns
            .map(|port| format!("    meta l4proto {{ tcp, udp }} th dport 53 redirect to :{port}\n"))
            .unwrap_or_default(),
        outbound = p.outbound,
    )
}

impl RulesError {
    fn failed(command: &str, netns: &Path, why: impl std::fmt::Display) -> Self {
        RulesError::Failed {
            command: command.to_owned(),
            netns: netns.display().to_string(),
            stderr: why.to_string(),
        }
    }
}

fn open(netns: &Path) -> Result<File, RulesError> {
    File::open(netns).map_err(|e| RulesError::failed("opening the namespace", netns, e))
}

/// Runs `f` on a short-lived thread switched into the network namespace at `netns` (a path
/// such as `/proc/<pid>/ns/net`): sockets it opens (libnftables', rtnetlink's) and sysctl
/// files it opens belong to that namespace. The agent's own threads never switch.
fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> Result<T, RulesError> + Send) -> Result<T, RulesError> {
    let file = open(netns)?;
    in_opened(&file, netns, f)
}

/// [`in_netns`] for a namespace already open (`netns` names it in errors): the namespace the
/// caller checked is the one written to, whatever its path reaches meanwhile.
fn in_opened<T: Send>(
    file: &File,
    netns: &Path,
    f: impl FnOnce() -> Result<T, RulesError> + Send,
) -> Result<T, RulesError> {
    super::netns::enter(file, f).unwrap_or_else(|e| match e {
        EnterError::Spawn(e) => Err(RulesError::failed("starting a thread for the namespace", netns, e)),
        EnterError::Setns(e) => Err(RulesError::failed("setns", netns, e)),
        EnterError::Panicked => Err(RulesError::failed(
            "switching into the namespace",
            netns,
            "thread panicked",
        )),
    })
}

/// The return path of each family: `fwmark 0x111/0xfff lookup 100` and table 100's `local`
/// default route through `lo`.
fn return_paths() -> [ReturnPath; 2] {
    [false, true].map(|ipv6| ReturnPath {
        ipv6,
        mark: RETURN_MARK,
        mask: MARK_MASK,
        table: ROUTE_TABLE,
    })
}

/// Runs an nftables batch in the calling thread's namespace, `command` naming it in errors.
fn nft_in(netns: &Path, command: &str, batch: &str) -> Result<String, RulesError> {
    nft::run(batch).map_err(|e| RulesError::failed(command, netns, e))
}

/// Writes a sysctl through the sysctl tree `proc_sys` of a proc filesystem, wherever it is
/// mounted: a net sysctl file belongs to the network namespace of the thread that opens it,
/// not to the mount, so a read-write host `/proc/sys` mounted elsewhere serves when the
/// runtime's own `/proc/sys` is read-only (tests/sysctl_dir.rs shows it).
fn write_sysctl(netns: &Path, proc_sys: &Path, key: &str, value: &str) -> Result<(), RulesError> {
    std::fs::write(sysctl_path(proc_sys, key), value)
        .map_err(|e| RulesError::failed(&format!("sysctl {key}={value}"), netns, e))
}

/// The file of sysctl `key` (dotted) under the sysctl tree `proc_sys`.
fn sysctl_path(proc_sys: &Path, key: &str) -> std::path::PathBuf {
    proc_sys.join(key.replace('.', "/"))
}

/// Checks at start-up that the per-pod sysctl can be written through `proc_sys` (opened for
/// writing, nothing written), so a read-only or missing mount is one clear error instead of
/// every pod's enrolment failing.
pub fn check_proc_sys(proc_sys: &Path) -> Result<(), RulesError> {
    let path = sysctl_path(proc_sys, MIGRATE_REQ);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map(drop)
        .map_err(|e| RulesError::Failed {
            command: format!("opening {} for writing", path.display()),
            netns: "the agent's namespace".into(),
            stderr: e.to_string(),
        })
}

/// The per-pod sysctl: when an old ztunnel closes its listener during an upgrade,
/// connections still waiting in its accept queue move to the new ztunnel's listener (same
/// SO_REUSEPORT group) instead of being reset.
const MIGRATE_REQ: &str = "net.ipv4.tcp_migrate_req";

/// [`install_via`] with the runtime's `/proc/sys`.
pub fn install(netns: &Path, ports: Ports) -> Result<(), RulesError> {
    install_via(netns, ports, Path::new(PROC_SYS))
}

/// Installs (or replaces) the redirection in the namespace at `netns` (a path such as
/// `/proc/<pid>/ns/net` or `/var/run/netns/<name>`), writing its sysctl through the sysctl
/// tree `proc_sys`. Pod start-up waits for this: it runs in-process, in about a millisecond.
/// [`dump`] shows what the kernel then holds.
pub fn install_via(netns: &Path, ports: Ports, proc_sys: &Path) -> Result<(), RulesError> {
    let file = open(netns)?;
    install_in(&file, netns, ports, proc_sys)
}

/// [`install_via`] into the namespace `file` reaches (`netns` names it in errors).
pub fn install_in(file: &File, netns: &Path, ports: Ports, proc_sys: &Path) -> Result<(), RulesError> {
    in_opened(file, netns, || {
        // Creating the table where there is none (every new pod) is a third of the cost of
        // replacing it; an existing table (a re-install) is replaced in one transaction.
        match nft::run(&first_install(ports)) {
            Err(NftError::Failed(e)) if e.contains("File exists") => nft_in(netns, "nft -f", &ruleset(ports)).map(drop),
            other => other.map(drop).map_err(|e| RulesError::failed("nft -f", netns, e)),
        }?;
        let nl_failed = |what: &'static str| move |e: std::io::Error| RulesError::failed(what, netns, e);
        let mut nl = Netlink::open().map_err(nl_failed("opening rtnetlink"))?;
        // The return path routes through lo (normally up already; the runtime sets it up).
        nl.loopback_up().map_err(nl_failed("link set lo up"))?;
        for path in return_paths() {
            nl.add(path).map_err(nl_failed("adding the return path"))?;
        }
        write_sysctl(netns, proc_sys, MIGRATE_REQ, "1")
    })
}

/// The agent's table as nftables lists it.
pub fn dump(netns: &Path) -> Result<String, RulesError> {
    in_netns(netns, || {
        nft_in(netns, "nft list table", &format!("list table inet {TABLE}"))
    })
}

/// [`remove_via`] with the runtime's `/proc/sys`.
pub fn remove(netns: &Path) -> Result<(), RulesError> {
    remove_via(netns, Path::new(PROC_SYS))
}

/// Removes the table, the rules and the routes `install` added (the sysctl through
/// `proc_sys`). Removing what is not there is not an error (idempotent).
pub fn remove_via(netns: &Path, proc_sys: &Path) -> Result<(), RulesError> {
    let file = open(netns)?;
    remove_in(&file, netns, proc_sys)
}

/// [`remove_via`] from the namespace `file` reaches (`netns` names it in errors).
pub fn remove_in(file: &File, netns: &Path, proc_sys: &Path) -> Result<(), RulesError> {
    in_opened(file, netns, || {
        match nft::run(&format!("delete table inet {TABLE}")) {
            Ok(_) => {}
            Err(NftError::Failed(e)) if e.contains("No such file") => {}
            Err(e) => return Err(RulesError::failed("nft delete table", netns, e)),
        }
        let mut nl = Netlink::open().map_err(|e| RulesError::failed("opening rtnetlink", netns, e))?;
        for path in return_paths() {
            nl.delete(path)
                .map_err(|e| RulesError::failed("deleting the return path", netns, e))?;
        }
        let _ = write_sysctl(netns, proc_sys, MIGRATE_REQ, "0");
        Ok(())
    })
}

/// True when the namespace carries the agent's table.
pub fn installed(netns: &Path) -> bool {
    dump(netns).is_ok()
}

/// A part of the redirection [`verify`] did not find.
#[derive(Debug, thiserror::Error)]
pub enum Missing {
    #[error("the nft table inet {TABLE} is missing")]
    Table,
    #[error("the nft chain {chain} of table inet {TABLE} lacks `{statement}`")]
    Statement { chain: &'static str, statement: String },
    #[error("the policy rule `fwmark {RETURN_MARK:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE}` is missing (IPv{0})")]
    PolicyRule(u8),
    #[error("the route `local default dev lo` of table {ROUTE_TABLE} is missing (IPv{0})")]
    Route(u8),
    #[error("reading the redirection: {0}")]
    Read(#[from] RulesError),
}

/// What each chain must hold (as `nft list` prints it), for [`verify`].
fn expected(p: Ports) -> Vec<(&'static str, String)> {
    let mut want = vec![
        ("prerouting_raw", "ct zone set 1".to_owned()),
        ("output_raw", "ct zone set 1".to_owned()),
        ("prerouting_mangle", "ct mark set".to_owned()),
        ("output_mangle", "meta mark set".to_owned()),
        ("prerouting_nat", format!("ip saddr {PROBE_SOURCE} return")),
        ("prerouting_nat", format!("tcp dport {} return", p.inbound)),
        ("prerouting_nat", format!("redirect to :{}", p.inbound_plaintext)),
        ("output_nat", "oifname \"lo\" return".to_owned()),
        ("output_nat", format!("redirect to :{}", p.outbound)),
    ];
    if let Some(dns) = p.dns {
        want.push(("output_nat", format!("redirect to :{dns}")));
    }
    want
}

/// The statements of `chain` in an `nft list table` dump.
fn chain_of<'a>(dump: &'a str, chain: &str) -> Vec<&'a str> {
    let head = format!("chain {chain} {{");
    dump.lines()
        .skip_while(|l| l.trim() != head)
        .skip(1)
        .take_while(|l| l.trim() != "}")
        .map(str::trim)
        .collect()
}

/// Checks every part [`install`] writes: the table with each chain's statements, and for both
/// families the policy rule and the `local` route of table 100. The error names the first
/// part missing.
pub fn verify(netns: &Path, ports: Ports) -> Result<(), Missing> {
    let dump = match dump(netns) {
        Ok(d) => d,
        Err(RulesError::Failed { stderr, .. }) if stderr.contains("No such file") => return Err(Missing::Table),
        Err(e) => return Err(e.into()),
    };
    for (chain, statement) in expected(ports) {
        if !chain_of(&dump, chain).iter().any(|l| l.contains(statement.as_str())) {
            return Err(Missing::Statement { chain, statement });
        }
    }
    let seen = in_netns(netns, || {
        let mut nl = Netlink::open().map_err(|e| RulesError::failed("opening rtnetlink", netns, e))?;
        return_paths()
            .into_iter()
            .map(|path| {
                nl.seen(path)
                    .map_err(|e| RulesError::failed("listing rules and routes", netns, e))
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    for (seen, version) in seen.iter().zip([4, 6]) {
        if !seen.rule {
            return Err(Missing::PolicyRule(version));
        }
        if !seen.route {
            return Err(Missing::Route(version));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_names_every_port() {
        let r = ruleset(Ports {
            dns: None,
            ..Ports::default()
        });
        for want in [
            "redirect to :15001",
            "redirect to :15006",
            "tcp dport 15008 return",
            "0x539",
            "0x111",
        ] {
            assert!(r.contains(want), "missing {want}:\n{r}");
        }
        assert!(!r.contains("th dport 53"), "no DNS redirect without a DNS proxy");
        let with_dns = ruleset(Ports::default());
        assert!(with_dns.contains("th dport 53 redirect to :15053"), "{with_dns}");
    }
}
