//! A tiny command-line parser: `--flag`, `--name value` and `--name=value`.

use anyhow::{Result, bail};

/// The arguments of one command, consumed option by option.
#[derive(Debug)]
pub struct Args(Vec<String>);

impl Args {
    pub fn new(args: Vec<String>) -> Self {
        Self(args)
    }

    /// Removes `name` if present and tells whether it was.
    pub fn flag(&mut self, name: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|a| a != name);
        self.0.len() != before
    }

    /// Removes `name value` (or `name=value`) and returns the value. Given twice, the last
    /// one wins.
    pub fn value(&mut self, name: &str) -> Result<Option<String>> {
        let mut found = None;
        let mut rest = Vec::with_capacity(self.0.len());
        let mut iter = std::mem::take(&mut self.0).into_iter();
        while let Some(arg) = iter.next() {
            if arg == name {
                match iter.next() {
                    Some(value) if !value.starts_with("--") => found = Some(value),
                    _ => bail!("{name} needs a value"),
                }
            } else if let Some(value) = arg.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                found = Some(value.to_owned());
            } else {
                rest.push(arg);
            }
        }
        self.0 = rest;
        Ok(found)
    }

    /// Fails if anything was not consumed.
    pub fn finish(self) -> Result<()> {
        if let Some(arg) = self.0.first() {
            bail!("unexpected argument {arg:?}");
        }
        Ok(())
    }
}
