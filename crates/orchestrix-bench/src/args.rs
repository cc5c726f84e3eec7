//! The command line: a scenario name, then `--name value` (or `--name=value`) options.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context as _, bail};

/// A parsed command line.
#[derive(Debug, Clone)]
pub struct Args {
    /// The first word: the scenario (or `child`).
    pub scenario: String,
    /// Words after the scenario that are not options (the child's role).
    pub positional: Vec<String>,
    options: HashMap<String, String>,
}

impl Args {
    pub fn parse(words: impl IntoIterator<Item = String>) -> anyhow::Result<Self> {
        let mut words = words.into_iter();
        let Some(scenario) = words.next() else {
            bail!("no scenario given");
        };
        let mut positional = Vec::new();
        let mut options = HashMap::new();
        while let Some(word) = words.next() {
            let Some(name) = word.strip_prefix("--") else {
                positional.push(word);
                continue;
            };
            let (name, value) = match name.split_once('=') {
                Some((name, value)) => (name.to_owned(), value.to_owned()),
                None => {
                    let value = words
                        .next()
                        .with_context(|| format!("option --{name} needs a value"))?;
                    (name.to_owned(), value)
                }
            };
            options.insert(name, value);
        }
        Ok(Self {
            scenario,
            positional,
            options,
        })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.options.get(name).map(String::as_str)
    }

    /// A required option.
    pub fn required(&self, name: &str) -> anyhow::Result<&str> {
        self.get(name)
            .with_context(|| format!("option --{name} is required"))
    }

    /// A number option, or `default`.
    pub fn number<T: FromStr>(&self, name: &str, default: T) -> anyhow::Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        match self.get(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .with_context(|| format!("option --{name}: {text:?} is not a number")),
        }
    }

    /// A positive number option, or `default`.
    pub fn count(&self, name: &str, default: u64) -> anyhow::Result<u64> {
        let n = self.number(name, default)?;
        if n == 0 {
            bail!("option --{name} must be at least 1");
        }
        Ok(n)
    }

    /// A duration option in milliseconds, or `default`.
    pub fn millis(&self, name: &str, default: Duration) -> anyhow::Result<Duration> {
        let default_ms = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
        Ok(Duration::from_millis(self.count(name, default_ms)?))
    }

    /// A duration option in (fractional) seconds, or `default`.
    pub fn seconds(&self, name: &str, default: Duration) -> anyhow::Result<Duration> {
        let secs: f64 = self.number(name, default.as_secs_f64())?;
        if !(0.05..=3600.0).contains(&secs) {
            bail!("option --{name} must be between 0.05 and 3600 seconds");
        }
        Ok(Duration::from_secs_f64(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Args {
        Args::parse(line.split_whitespace().map(str::to_owned)).unwrap()
    }

    #[test]
    fn options_take_the_next_word_or_an_equals_sign() {
        let args = parse("storm --store redis --keys=50 extra");
        assert_eq!(args.scenario, "storm");
        assert_eq!(args.get("store"), Some("redis"));
        assert_eq!(args.count("keys", 1).unwrap(), 50);
        assert_eq!(args.positional, ["extra"]);
    }

    #[test]
    fn zero_counts_and_missing_values_are_refused() {
        assert!(parse("storm --keys 0").count("keys", 1).is_err());
        assert!(Args::parse(["storm".to_owned(), "--keys".to_owned()]).is_err());
    }
}
