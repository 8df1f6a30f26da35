//! Terminal styling: colour only when stdout is a terminal and `NO_COLOR` is unset, with
//! plain-text marks (`ok`/`FAIL`) otherwise so piped output stays greppable.

use std::io::IsTerminal;

/// How results are marked on stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

impl Style {
    /// Colour when stdout is a terminal and `NO_COLOR` is not set (to any value).
    pub fn detect() -> Style {
        Style::decide(std::io::stdout().is_terminal(), std::env::var_os("NO_COLOR").is_some())
    }

    pub fn decide(is_terminal: bool, no_color: bool) -> Style {
        Style {
            color: is_terminal && !no_color,
        }
    }

    pub fn plain() -> Style {
        Style { color: false }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// A passed check.
    pub fn ok(self) -> String {
        if self.color {
            self.paint("32", "✓")
        } else {
            "ok".to_owned()
        }
    }

    /// A failed check.
    pub fn fail(self) -> String {
        if self.color {
            self.paint("31", "✗")
        } else {
            "FAIL".to_owned()
        }
    }

    /// A warning that does not fail the command.
    pub fn warn(self) -> String {
        if self.color {
            self.paint("33", "!")
        } else {
            "WARN".to_owned()
        }
    }

    pub fn red(self, text: &str) -> String {
        self.paint("31", text)
    }

    pub fn yellow(self, text: &str) -> String {
        self.paint("33", text)
    }

    pub fn dim(self, text: &str) -> String {
        self.paint("2", text)
    }

    pub fn bold(self, text: &str) -> String {
        self.paint("1", text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_color_wins_over_a_terminal() {
        assert!(!Style::decide(true, true).color);
        assert!(!Style::decide(false, false).color);
        assert!(Style::decide(true, false).color);
        assert_eq!(Style::plain().ok(), "ok");
        assert_eq!(Style::plain().fail(), "FAIL");
    }
}
