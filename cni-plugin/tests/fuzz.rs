//! Property-based fuzzing of the CNI plugin's inputs: stdin (the network config JSON, its
//! `prevResult`), `CNI_ARGS`, and the environment. Hostile input must give a CNI error, never
//! a panic (a panicking plugin leaves the runtime with no result to report), and a valid
//! config must be read back exactly. Case count: `PROPTEST_CASES` (default 256); a long run is
//! `PROPTEST_CASES=100000 cargo test --release -p cni-plugin --test fuzz`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::collections::HashMap;
use std::net::IpAddr;

use cni_plugin::plugin::config::{
    decode_stdin, is_cidr, pod_ref, prev_result_ips, version_at_least, CniArgs, CniEnv, Command, NetConf,
    SUPPORTED_VERSIONS,
};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Arbitrary JSON, a few levels deep, using the keys the plugin reads.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("cniVersion".to_owned()),
        Just("name".to_owned()),
        Just("type".to_owned()),
        Just("prevResult".to_owned()),
        Just("agentSocket".to_owned()),
        Just("agentTimeoutMs".to_owned()),
        Just("logFile".to_owned()),
        Just("ips".to_owned()),
        Just("address".to_owned()),
        "[a-zA-Z]{0,6}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just("1.0.0".to_owned()),
            Just("0.4.0".to_owned()),
            Just("10.0.0.1/24".to_owned()),
            Just("::1/129".to_owned()),
            any::<String>(),
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Everything the plugin does with stdin, in order; errors are fine, panics are not.
fn read_config(raw: &[u8]) {
    let Ok(map) = decode_stdin(raw) else { return };
    if let Ok(conf) = NetConf::from_map(&map) {
        if let Some(prev) = &conf.prev_result {
            let _ = prev_result_ips(prev);
        }
    }
}

fn env_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("ADD".to_owned()),
        Just("DEL".to_owned()),
        Just("CHECK".to_owned()),
        Just("K8S_POD_NAME=a;K8S_POD_NAMESPACE=b".to_owned()),
        "[A-Z_=;a-z0-9/]{0,24}",
        any::<String>(),
    ]
}

proptest! {
    #[test]
    fn stdin_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
        read_config(&raw);
    }

    #[test]
    fn stdin_json_never_panics(v in json_value()) {
        read_config(v.to_string().as_bytes());
    }

    #[test]
    fn valid_config_reads_back(
        version in proptest::sample::select(SUPPORTED_VERSIONS),
        name in "[a-z0-9-]{1,16}",
        timeout in 1u64..=60_000,
        ips in proptest::collection::vec((any::<[u8; 4]>(), 0u8..=32), 0..4),
    ) {
        let addresses: Vec<String> = ips
            .iter()
            .map(|(ip, p)| format!("{}/{p}", IpAddr::from(*ip)))
            .collect();
        let conf = json!({
            "cniVersion": version, "name": name, "type": "ambient",
            "agentTimeoutMs": timeout,
            "prevResult": {"ips": addresses.iter().map(|a| json!({"address": a})).collect::<Vec<_>>()},
        });
        let map = decode_stdin(conf.to_string().as_bytes()).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let got = NetConf::from_map(&map).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert_eq!(got.name, name);
        prop_assert_eq!(got.agent_timeout.as_millis(), u128::from(timeout));
        let prev = got.prev_result.unwrap_or_default();
        prop_assert_eq!(prev_result_ips(&prev).map_err(|e| TestCaseError::fail(format!("{e:?}")))?, addresses);
    }

    #[test]
    fn is_cidr_agrees_with_ipnet(s in prop_oneof![
        any::<String>(),
        "[0-9a-f.:]{1,20}/[0-9]{0,4}",
        (any::<[u8; 16]>(), 0u32..200).prop_map(|(ip, p)| format!("{}/{p}", IpAddr::from(ip))),
    ]) {
        prop_assert_eq!(is_cidr(&s), s.parse::<ipnet::IpNet>().is_ok(), "{:?}", s);
    }

    #[test]
    fn cni_args_parse_and_get(raw in env_value()) {
        if let Ok(args) = CniArgs::parse(&raw) {
            let _ = pod_ref(&args);
        }
    }

    #[test]
    fn cni_args_last_value_wins(pairs in proptest::collection::vec(("[A-Z_]{1,8}", "[a-z0-9.-]{0,8}"), 1..6)) {
        let raw = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";");
        let args = CniArgs::parse(&raw).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        for (k, _) in &pairs {
            let last = pairs.iter().rev().find(|(k2, _)| k2 == k).map(|(_, v)| v.as_str());
            prop_assert_eq!(args.get(k), last.filter(|v| !v.is_empty()));
        }
    }

    #[test]
    fn environment_never_panics(vals in proptest::collection::vec(env_value(), 6)) {
        let keys = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"];
        let env: HashMap<String, String> = keys.iter().map(|k| k.to_string()).zip(vals).collect();
        if let Ok(cmd) = Command::from_env(&env) {
            let _ = CniEnv::from_env(&env, cmd);
        }
    }

    #[test]
    fn version_compare_never_panics(a in env_value(), b in env_value()) {
        let _ = version_at_least(&a, &b);
        prop_assert!(version_at_least(&a, &a));
    }
}
