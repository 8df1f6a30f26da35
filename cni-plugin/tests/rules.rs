//! The agent's redirection rules in a real network namespace: installed exactly as reported,
//! idempotent, and removed without leftovers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::path::PathBuf;
use std::process::Command;

use cni_plugin::agent::rules::{self, Ports};

struct Ns(String);

impl Ns {
    fn new() -> Option<Ns> {
        Ns::new_named("rules")
    }

    fn new_named(prefix: &str) -> Option<Ns> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root");
            return None;
        }
        let name = format!("{prefix}{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(Ns(name))
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }

    fn exec(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn install_is_exact_idempotent_and_removable() {
    let Some(ns) = Ns::new() else { return };
    rules::install(&ns.path(), Ports::default()).unwrap();
    let reported = rules::dump(&ns.path()).unwrap();
    // What the agent reports is byte for byte what the kernel holds, and what it meant to
    // write: every rule of its ruleset is there.
    assert_eq!(reported, ns.exec(&["nft", "list", "table", "inet", rules::TABLE]));
    for want in [
        "redirect to :15001",
        "redirect to :15006",
        "dport 53 redirect to :15053",
        "ct zone set 1",
    ] {
        assert!(reported.contains(want), "{want} missing:\n{reported}");
    }

    // Installing again (the replace path) changes nothing and duplicates nothing.
    rules::install(&ns.path(), Ports::default()).unwrap();
    assert_eq!(reported, rules::dump(&ns.path()).unwrap());
    for family in ["-4", "-6"] {
        let rules_list = ns.exec(&["ip", family, "rule", "show"]);
        assert_eq!(rules_list.matches("lookup 100").count(), 1, "{rules_list}");
    }
    assert!(ns
        .exec(&["ip", "route", "show", "table", "100"])
        .contains("local default dev lo"));

    // With the DNS proxy off, DNS is left alone (and the ruleset is valid for nft).
    rules::install(
        &ns.path(),
        Ports {
            dns: None,
            ..Ports::default()
        },
    )
    .unwrap();
    let without_dns = rules::dump(&ns.path()).unwrap();
    assert!(!without_dns.contains("redirect to :15053"), "{without_dns}");

    // Removal leaves nothing behind, and removing twice is fine.
    rules::remove(&ns.path()).unwrap();
    rules::remove(&ns.path()).unwrap();
    assert!(!rules::installed(&ns.path()));
    assert_eq!(ns.exec(&["nft", "list", "ruleset"]).trim(), "");
    for family in ["-4", "-6"] {
        assert!(!ns.exec(&["ip", family, "rule", "show"]).contains("lookup 100"));
        assert_eq!(ns.exec(&["ip", family, "route", "show", "table", "100"]).trim(), "");
    }
}

#[test]
fn a_namespace_that_does_not_exist_is_a_clear_error() {
    let e = rules::install(std::path::Path::new("/var/run/netns/does-not-exist"), Ports::default()).unwrap_err();
    assert!(e.to_string().contains("does-not-exist"), "{e}");
}

#[test]
fn verify_names_each_missing_part() {
    let Some(ns) = Ns::new_named("verify") else { return };
    let path = ns.path();
    rules::install(&path, Ports::default()).unwrap();
    rules::verify(&path, Ports::default()).unwrap();
    let broken: [(&[&str], &str); 4] = [
        (
            &["ip", "-6", "rule", "del", "fwmark", "0x111/0xfff", "lookup", "100"],
            "policy rule",
        ),
        (
            &["ip", "-4", "route", "flush", "table", "100"],
            "route `local default dev lo` of table 100 is missing (IPv4)",
        ),
        (
            &["nft", "flush", "chain", "inet", "ambient", "prerouting_nat"],
            "chain prerouting_nat",
        ),
        (
            &["nft", "delete", "table", "inet", "ambient"],
            "table inet ambient is missing",
        ),
    ];
    for (by_hand, named) in broken {
        ns.exec(by_hand);
        let e = rules::verify(&path, Ports::default()).expect_err("verify passed with a part missing");
        assert!(e.to_string().contains(named), "after {by_hand:?}: {e}");
        rules::install(&path, Ports::default()).unwrap();
        rules::verify(&path, Ports::default()).unwrap();
    }
    rules::remove(&path).unwrap();
    assert!(matches!(
        rules::verify(&path, Ports::default()),
        Err(rules::Missing::Table)
    ));
}
