//! Reading Prometheus text exposition in tests: the value of one series.

/// The value of the first sample of `name` whose line carries every one of `labels`
/// (`key="value"` fragments), or 0 when there is none: a counter never incremented is absent.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && labels.iter().all(|want| l.contains(want))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The sum over every series of `name` whose line carries all of `labels`: a counter split
/// by labels the test does not care about (which series a map lists first is chance).
pub fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && labels.iter().all(|want| l.contains(want))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::{sample, sum};

    #[test]
    fn finds_the_series_by_name_and_labels() {
        let text = "# HELP x_total X\nx_total{reason=\"a\"} 3\nx_total{reason=\"b\"} 5\nx_total_other 9\ny 1\n";
        assert_eq!(sample(text, "x_total", &["reason=\"b\""]), 5.0);
        assert_eq!(sample(text, "x_total", &["reason=\"c\""]), 0.0);
        assert_eq!(sample(text, "y", &[]), 1.0);
        assert_eq!(
            sample(text, "x", &[]),
            0.0,
            "a prefix of another name is not that series"
        );
    }
}
