//! `demo traffic`: one curl invocation in the client's network namespace fetching the URL
//! `n` times (headers and body to stdout, a marker with the status after each transfer),
//! summarized as counts per status code and per server (`x-served-by`, else the body's
//! first line when it looks like a name).

use std::collections::BTreeMap;

/// What curl prints after each transfer (`-w`).
pub const MARKER: &str = "@@meshctl-status ";

/// The curl arguments (after `curl`) for `n` requests to `url`.
pub fn curl_args(url: &str, n: usize, headers: &[String], keep_alive: bool, timeout_secs: u64) -> Vec<String> {
    let mut args = vec![
        "-s".to_owned(),
        "-D".to_owned(),
        "-".to_owned(),
        "--max-time".to_owned(),
        timeout_secs.to_string(),
        "-w".to_owned(),
        format!("\n{MARKER}%{{http_code}}\n"),
    ];
    if !keep_alive {
        // A new connection per request, so connection-level (L4) load balancing shows too.
        args.push("-H".to_owned());
        args.push("Connection: close".to_owned());
    }
    for h in headers {
        args.push("-H".to_owned());
        args.push(h.clone());
    }
    args.extend(std::iter::repeat_n(url.to_owned(), n));
    args
}

/// Counts by status code and by server.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub total: usize,
    pub by_status: BTreeMap<String, usize>,
    pub by_server: BTreeMap<String, usize>,
}

/// The server that answered one transfer's output (headers then body).
fn server(transfer: &str) -> String {
    let mut lines = transfer.lines();
    let mut saw_headers = false;
    for line in lines.by_ref() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            if saw_headers {
                break;
            }
            continue;
        }
        saw_headers = true;
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("x-served-by") {
                return v.trim().to_owned();
            }
        }
    }
    // Bodies of several answers (1xx/redirect headers) are rare here; take the first line.
    match lines.next().map(str::trim) {
        Some(first) if !first.is_empty() && first.len() <= 63 && !first.contains(char::is_whitespace) => {
            first.to_owned()
        }
        _ => "-".to_owned(),
    }
}

impl Summary {
    /// Adds everything in curl's output.
    pub fn parse(output: &str) -> Summary {
        let mut s = Summary::default();
        let mut transfer = String::new();
        for line in output.split_inclusive('\n') {
            if let Some(code) = line.trim_end().strip_prefix(MARKER) {
                s.add(code, &transfer);
                transfer.clear();
            } else {
                transfer.push_str(line);
            }
        }
        s
    }

    pub fn add(&mut self, code: &str, transfer: &str) {
        self.total += 1;
        let code = if code == "000" { "000 (no answer)" } else { code };
        *self.by_status.entry(code.to_owned()).or_default() += 1;
        let who = if transfer.trim().is_empty() {
            "-".to_owned()
        } else {
            server(transfer)
        };
        *self.by_server.entry(who).or_default() += 1;
    }

    /// Whether every request got a 2xx answer.
    pub fn all_ok(&self) -> bool {
        self.total > 0 && self.by_status.keys().all(|k| k.starts_with('2'))
    }

    pub fn render(&self) -> String {
        let pct = |n: usize| {
            if self.total == 0 {
                0.0
            } else {
                100.0 * n as f64 / self.total as f64
            }
        };
        let mut out = format!("{} request(s)\nstatus:\n", self.total);
        for (code, n) in &self.by_status {
            out.push_str(&format!("  {code:<16} {n:>6}  {:5.1}%\n", pct(*n)));
        }
        out.push_str("served by:\n");
        for (who, n) in &self.by_server {
            out.push_str(&format!("  {who:<16} {n:>6}  {:5.1}%\n", pct(*n)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_status_and_servers() {
        let out = format!(
            "HTTP/1.1 200 OK\r\nx-served-by: web-v1\r\ncontent-length: 7\r\n\r\nweb-v1\n\n{MARKER}200\n\
             HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nweb-v2\npath GET /\n\n{MARKER}200\n\
             HTTP/1.1 503 Service Unavailable\r\ncontent-length: 19\r\n\r\nno healthy upstream\n{MARKER}503\n\
             \n{MARKER}000\n"
        );
        let s = Summary::parse(&out);
        assert_eq!(s.total, 4);
        assert_eq!(s.by_status.get("200"), Some(&2));
        assert_eq!(s.by_status.get("503"), Some(&1));
        assert_eq!(s.by_status.get("000 (no answer)"), Some(&1));
        assert_eq!(s.by_server.get("web-v1"), Some(&1));
        assert_eq!(s.by_server.get("web-v2"), Some(&1));
        assert_eq!(s.by_server.get("-"), Some(&2), "{:?}", s.by_server);
        assert!(!s.all_ok());
        let text = s.render();
        assert!(text.starts_with("4 request(s)\nstatus:\n  000 (no answer)"), "{text}");
        assert!(text.contains("  200                   2   50.0%"), "{text}");
    }

    #[test]
    fn args_repeat_the_url_and_pass_headers() {
        let a = curl_args("http://x/", 3, &["x-canary: true".to_owned()], false, 5);
        assert_eq!(a.iter().filter(|x| *x == "http://x/").count(), 3);
        assert!(a.windows(2).any(|w| w[0] == "-H" && w[1] == "x-canary: true"));
        assert!(a.windows(2).any(|w| w[0] == "-H" && w[1] == "Connection: close"));
        assert!(!curl_args("u", 1, &[], true, 5).contains(&"Connection: close".to_owned()));
    }
}
