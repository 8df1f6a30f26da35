//! Reading Prometheus text exposition in tests: the values of the series of one metric.

/// The values of every series of `name` whose line carries all of `labels` (`key="value"`
/// fragments), in the order the text lists them.
fn values<'t>(text: &'t str, name: &'t str, labels: &'t [&'t str]) -> impl Iterator<Item = f64> + 't {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(move |l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && labels.iter().all(|want| l.contains(want))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// The value of the first matching series, or 0 when there is none: a counter never
/// incremented is absent.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    values(text, name, labels).next().unwrap_or(0.0)
}

/// The sum over every matching series: a counter split by labels the test does not care
/// about (which series a map lists first is chance).
pub fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    values(text, name, labels).sum()
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
        assert_eq!(sum(text, "x_total", &[]), 8.0);
    }
}
