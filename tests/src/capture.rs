//! The redirection an ambient pod gets, written into its namespace: outbound TCP to 15001,
//! inbound TCP (except HBONE on 15008) to 15006, and the connmark/fwmark/table-100 return
//! path that lets ztunnel connect to the app from the client's own address.

use crate::netns::Netns;

/// nftables ruleset of a captured pod (one table, replaced atomically).
pub const RULES: &str = r#"
table inet ambient
delete table inet ambient
table inet ambient {
  chain prerouting_mangle {
    type filter hook prerouting priority mangle; policy accept;
    meta mark & 0xfff == 0x539 ct mark set 0x111
  }
  chain output_mangle {
    type route hook output priority mangle; policy accept;
    ct mark & 0xfff == 0x111 meta mark set 0x111
  }
  chain prerouting_nat {
    type nat hook prerouting priority dstnat; policy accept;
    meta mark & 0xfff == 0x539 return
    ip saddr 169.254.7.127 return
    meta l4proto tcp tcp dport 15008 return
    meta l4proto tcp redirect to :15006
  }
  chain output_nat {
    type nat hook output priority -100; policy accept;
    meta mark & 0xfff == 0x539 return
    oifname "lo" return
    ip daddr 127.0.0.1 return
    ip6 daddr ::1 return
    meta l4proto tcp redirect to :15001
  }
}
"#;

/// Installs the capture rules and the policy route in `ns`.
pub fn install(ns: &Netns) -> anyhow::Result<()> {
    let path = std::env::temp_dir().join(format!("{}-capture.nft", ns.name));
    std::fs::write(&path, RULES)?;
    let r = ns.exec(&["nft", "-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    r?;
    for v in ["-4", "-6"] {
        ns.exec(&[
            "ip",
            v,
            "rule",
            "add",
            "fwmark",
            "0x111/0xfff",
            "pref",
            "32764",
            "lookup",
            "100",
        ])?;
    }
    ns.exec(&[
        "ip",
        "-4",
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ])?;
    ns.exec(&["ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100"])?;
    Ok(())
}
