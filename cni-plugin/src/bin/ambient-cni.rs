//! `ambient-cni`: the CNI plugin binary run by the container runtime. All the logic lives in
//! [`cni_plugin::plugin`]; this only wires the process environment, stdin and stdout to it.

use std::collections::HashMap;

fn main() {
    // vars_os: a non-UTF-8 variable must not abort the plugin (env::vars would panic).
    let env: HashMap<String, String> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .collect();
    let code = cni_plugin::plugin::run(&env, std::io::stdin().lock(), std::io::stdout().lock());
    std::process::exit(code);
}
