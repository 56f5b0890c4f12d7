//! VM names: 1 to 64 characters of letters, digits, '.', '_' and '-',
//! starting with a letter or digit. No '/', no "..", nothing hidden.

use std::fmt;

/// A validated VM name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmName(String);

/// Why a name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid VM name '{0}': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")]
pub struct BadName(pub String);

impl VmName {
    /// Validates `s`.
    pub fn new(s: &str) -> Result<Self, BadName> {
        let ok = (1..=64).contains(&s.len())
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadName(s.to_owned()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names() {
        for n in ["a", "web-1", "ci_runner.2", "A", &"x".repeat(64)] {
            assert_eq!(VmName::new(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn path_tricks_and_junk_are_refused() {
        for n in [
            "",
            "..",
            ".",
            ".hidden",
            "-x",
            "a/b",
            "../etc",
            "a b",
            "a\\0",
            "é",
            &"x".repeat(65),
            "a\nb",
        ] {
            let e = VmName::new(n).unwrap_err();
            assert!(e.to_string().contains("invalid VM name"), "{n:?}");
        }
    }
}
